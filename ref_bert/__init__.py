"""ref-bert: a from-scratch, autodiff-free ALBERT/BERT/UniLM reference in NumPy, with a CuPy backend.

    >>> import ref_bert
    >>> model = ref_bert.Model(ref_bert.Config.preset("tiny"), backend="numpy", dtype="float64", seed=0)
    >>> model.num_parameters()  # doctest: +SKIP

The math lives in :mod:`ref_bert.ops` (forward/backward pairs), :mod:`ref_bert.encoder` and
:mod:`ref_bert.heads`; :mod:`ref_bert.model` only orchestrates them.
"""
from .config import Config, PRESETS
from .model import Model, ModelOutput
from .params import count_parameters, parameter_shapes
from .tokenization import Encoding, Tokenizer

__version__ = "0.1.0"
__all__ = ["Config", "PRESETS", "Model", "ModelOutput", "count_parameters", "parameter_shapes", "Tokenizer", "Encoding", "__version__"]
