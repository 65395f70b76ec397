"""The fused CuPy kernels (backends/cupy_kernels.py), through the CuPy backend's fast table
(backends/cupy_fast.py), against the reference ops in ref_bert.

Two ways:
* On a GPU (``@pytest.mark.gpu``, skipped only where ``backends.available("cupy")`` is False): each
  entry of the CuPy backend's table on CuPy arrays against the reference op, float32 and float64; and a
  whole training step.
* Everywhere: :class:`NumpyKernelInterpreter` runs the kernels' own source text (the C expressions
  given to ``ElementwiseKernel`` / ``ReductionKernel``) with NumPy, so the arithmetic, the argument
  order of every call and the adapters of the CuPy table are checked on any machine; installed as the
  NumPy backend's fast table, it runs a whole training step through them.
* Where the CUDA toolkit is installed (``nvcc``; no GPU or driver needed): every kernel's source,
  wrapped the way CuPy wraps it, compiles for sm_90 with T = float and T = double. Whether CuPy
  accepts the calls (argument shapes, dtypes, broadcasting against passed outputs) is still the GPU
  tests' job.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time

import numpy as np
import pytest
import scipy.special

import backends
from backends.cupy_fast import fast_table
from backends.cupy_kernels import CupyKernels
from backends.cupy_optim_fast import optimizer_fast_table
from ref_bert import Config, Model

from ._models import dropout_case
from ref_bert import ops
from ref_bert.optim import Lamb, lamb
from ref_bert.optim.norms import sum_of_squares

# --- a NumPy interpreter for the kernel source -----------------------------------------------------
_FUNCTIONS = {"tanh": np.tanh, "exp": np.exp, "sqrt": np.sqrt, "erf": scipy.special.erf}


def _python(source: str) -> str:
    """Kernel C source in the restricted style of cupy_kernels.py -> Python statements."""
    lines = []
    for statement in source.split(";"):
        statement = statement.strip()
        if not statement:
            continue
        statement = re.sub(r"^T\s+", "", statement)     # declarations: "T u = ..." -> "u = ..."
        statement = statement.replace("(T)", "")          # casts: operands keep the arrays' dtype
        lines.append(statement)
    return "\n".join(lines)


def _params(spec: str):
    return [tuple(p.split()) for p in spec.split(",") if p.strip()]


class _Elementwise:
    def __init__(self, in_params, out_params, operation, name):
        self.ins, self.outs, self.code, self.name = _params(in_params), _params(out_params), _python(operation), name

    def _bind(self, args):
        arrays = [a for (kind, _), a in zip(self.ins, args) if kind == "T"]
        dtype = np.result_type(*arrays)
        assert all(np.asarray(a).dtype == dtype for a in arrays), f"{self.name}: mixed dtypes"
        env = dict(_FUNCTIONS)
        for (kind, name), a in zip(self.ins, args):
            env[name] = np.asarray(a) if kind == "T" else float(a)
        return env, dtype, [np.shape(a) for a in arrays]

    def __call__(self, *args):
        n = len(self.ins)
        env, dtype, shapes = self._bind(args[:n])
        outs = list(args[n:])
        assert len(outs) in (0, len(self.outs)), f"{self.name}: pass all outputs or none"
        shape = np.broadcast_shapes(*shapes, *[o.shape for o in outs])
        for (_, name), out in zip(self.outs, outs):
            assert out.dtype == dtype
            env[name] = out.copy()
        exec(self.code, env)
        results = []
        for i, (_, name) in enumerate(self.outs):
            value = np.broadcast_to(np.asarray(env[name]), shape).astype(dtype)
            if outs:
                outs[i][...] = value
                results.append(outs[i])
            else:
                results.append(value.copy())
        return results[0] if len(results) == 1 else tuple(results)


class _Reduction(_Elementwise):
    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name):
        assert reduce_expr == "a + b" and identity == "0", "the interpreter knows sums only"
        super().__init__(in_params, out_params, "", name)
        self.map_expr, self.post = map_expr, _python(post_map_expr)

    def __call__(self, *args, axis=None, keepdims=False):
        env, dtype, shapes = self._bind(args)
        mapped = np.broadcast_to(eval(self.map_expr, env), np.broadcast_shapes(*shapes))
        env["a"] = mapped.sum(axis=axis, keepdims=keepdims, dtype=dtype)
        exec(self.post, env)
        return np.asarray(env[self.outs[0][1]], dtype=dtype)


class NumpyKernelInterpreter:
    """Stands in for the cupy module: compiles nothing, interprets the kernel source with NumPy."""
    ElementwiseKernel = _Elementwise
    ReductionKernel = _Reduction
    empty_like = staticmethod(np.empty_like)
    asarray = staticmethod(np.asarray)


# --- the kernel source compiled by nvcc, wrapped as CuPy wraps it ---------------------------------------
# The wrappers below follow CuPy's code generators (cupy/_core/_kernel.pyx and _reduction.pyx, read at
# cupy-cuda13x 14.2.0). They leave out CuPy's CArray/CIndexer indexing (carray.cuh), which does not
# depend on the kernel source; what the kernel source sees (the names bound, their types and constness,
# the macros, the scalars) is CuPy's. With that CuPy installed, the exact source it generates for these
# kernels (from its internal _get_elementwise_kernel_code / _ReductionKernel_get_cached_function_code,
# which need no device) also compiles, with NVRTC and with nvcc, for sm_90.
class _RecordedKernel:
    """The arguments one ``ElementwiseKernel`` / ``ReductionKernel`` constructor was given (the names
    and defaults of CuPy's own signatures)."""

    def __init__(self, kind, in_params, out_params, name, preamble="", **source):
        self.kind, self.in_params, self.out_params, self.name, self.preamble = \
            kind, in_params, out_params, name, preamble
        self.source = source   # operation, or map_expr / reduce_expr / post_map_expr / identity / reduce_type


class KernelSourceRecorder:
    """Stands in for the cupy module: records every kernel's constructor arguments, compiles nothing."""

    @staticmethod
    def ElementwiseKernel(in_params, out_params, operation, name="kernel", reduce_dims=True, preamble="",
                          **kwargs):
        return _RecordedKernel("elementwise", in_params, out_params, name, preamble, operation=operation)

    @staticmethod
    def ReductionKernel(in_params, out_params, map_expr, reduce_expr, post_map_expr, identity,
                        name="reduce_kernel", reduce_type=None, reduce_dims=True, preamble="", options=()):
        return _RecordedKernel("reduction", in_params, out_params, name, preamble, map_expr=map_expr,
                               reduce_expr=reduce_expr, post_map_expr=post_map_expr, identity=identity,
                               reduce_type=reduce_type)


def recorded_kernels(kernels=None):
    """Every kernel a :class:`CupyKernels` built, in definition order."""
    kernels = CupyKernels(KernelSourceRecorder) if kernels is None else kernels
    return [k for k in vars(kernels).values() if isinstance(k, _RecordedKernel)]


# Named dtypes in parameter specs -> C types, as CuPy's cupy._core._scalar.get_typename names them.
_C_TYPES = {"float64": "double", "float32": "float", "int64": "long long", "int32": "int", "bool": "bool"}


def _cuda_params(spec: str, is_const: bool):
    """A CuPy parameter spec ("T x, float64 eps") -> [(c_type, name, is_array)], parsed as CuPy's
    ParameterInfo does: the last two words are type and name; a one-letter type is a type variable
    (bound by a typedef), any other is a NumPy dtype name passed as a scalar."""
    params = []
    for item in filter(str.strip, spec.split(",")):
        *keywords, type_, name = item.split()
        if keywords:
            raise NotImplementedError(f"parameter {item!r}: the nvcc wrapper knows no 'raw'/'_non_const'")
        if len(type_) == 1:
            params.append((type_, name, True))
        else:
            dtype = np.dtype(type_).name            # raises for an unknown dtype name, as CuPy does
            if dtype not in _C_TYPES:
                raise NotImplementedError(f"parameter {item!r}: add {dtype} to _C_TYPES")
            params.append((_C_TYPES[dtype], name, False))
    if is_const:
        return [(f"const {t}", n, a) for t, n, a in params]
    return params


def _signature(ins, outs, extra):
    """Kernel parameters: arrays as pointers named _raw_<name> (CuPy passes CArray<T, ...> _raw_<name>),
    scalars by value under their own name."""
    ps = [f"{t} *_raw_{n}" if is_array else f"{t} {n}" for t, n, is_array in ins + outs]
    return ", ".join(ps + extra)


def _cuda_elementwise(k) -> str:
    """One ElementwiseKernel as CuPy expands it (cupy/_core/_kernel.pyx, _get_elementwise_kernel_code
    and _get_simple_elementwise_kernel_code): inside a grid-stride loop over i (CuPy's CUPY_FOR, with
    ptrdiff_t i), every input array element is bound as ``const T &x = _raw_x[...]`` and every output as
    ``T &y = _raw_y[...]`` (so outputs can be read before they are written), then the operation."""
    ins, outs = _cuda_params(k.in_params, True), _cuda_params(k.out_params, False)
    names = [n for _, n, _ in ins + outs]
    if "i" in names:   # CuPy's own check: the loop index is called i
        raise ValueError(f"{k.name}: Can not use 'i' as a parameter name")
    binds = [f"{t} &{n} = _raw_{n}[i];" for t, n, is_array in ins + outs if is_array]
    return "\n".join([
        k.preamble,
        f'extern "C" __global__ void {k.name}({_signature(ins, outs, ["ptrdiff_t _size"])}) {{',
        "  #pragma unroll 1",
        "  for (ptrdiff_t i = static_cast<ptrdiff_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < _size;",
        "       i += static_cast<ptrdiff_t>(blockDim.x) * gridDim.x) {",
        *("    " + b for b in binds),
        f"    {k.source['operation']};",
        "  }",
        "}",
    ])


def _cuda_reduction(k) -> str:
    """One ReductionKernel as CuPy expands it (cupy/_core/_reduction.pyx, _create_reduction_function_code
    and _ReductionKernel_get_cached_function_code): ``#define REDUCE(a, b) (reduce_expr)`` and
    ``#define POST_MAP(a) (post_map_expr)``; ``_type_reduce`` is reduce_type (default: the first
    output's type); the running value starts at ``_type_reduce(identity)``; per input element, inputs are
    bound by value (``const T x = _raw_x[...]``) and ``_type_reduce _a = static_cast<_type_reduce>(map_expr)``
    is folded in with REDUCE; partial results are combined with REDUCE(_a, _b) as in CuPy's shared-memory
    step; then the output is bound as ``T &y = _raw_y[...]`` and POST_MAP(_s) runs. One thread per output
    here (CuPy uses a block per output and shared memory): the same expressions in the same contexts."""
    src = k.source
    ins, outs = _cuda_params(k.in_params, True), _cuda_params(k.out_params, False)
    reduce_type = src["reduce_type"] or outs[0][0]
    in_binds = [f"{t} {n} = _raw_{n}[_j];" for t, n, is_array in ins if is_array]
    out_binds = [f"{t} &{n} = _raw_{n}[_i];" for t, n, is_array in outs if is_array]
    return "\n".join([
        k.preamble,
        f"#define REDUCE(a, b) ({src['reduce_expr']})",
        f"#define POST_MAP(a) ({src['post_map_expr']})",
        f'extern "C" __global__ void {k.name}({_signature(ins, outs, ["ptrdiff_t _in_size", "ptrdiff_t _out_size"])}) {{',
        f"  typedef {reduce_type} _type_reduce;",
        "  ptrdiff_t _i = static_cast<ptrdiff_t>(blockIdx.x) * blockDim.x + threadIdx.x;",
        "  if (_i >= _out_size) return;",
        f"  _type_reduce _s = _type_reduce({src['identity']});",
        "  for (ptrdiff_t _j = _i; _j < _in_size; _j += _out_size) {",
        *("    " + b for b in in_binds),
        f"    _type_reduce _a = static_cast<_type_reduce>({src['map_expr']});",
        "    _s = REDUCE(_s, _a);",
        "  }",
        "  { _type_reduce _a = _s, _b = _type_reduce(" + src["identity"] + "); _s = REDUCE(_a, _b); }",
        *("  " + b for b in out_binds),
        "  POST_MAP(_s);",
        "}",
        "#undef REDUCE",
        "#undef POST_MAP",
    ])


def cuda_translation_unit(kernels, c_type: str) -> str:
    """All ``kernels`` (recorded) in one .cu file, every type variable (T) bound to ``c_type``."""
    type_vars = sorted({t.split()[-1] for k in kernels for spec in (k.in_params, k.out_params)
                        for t, _, _ in _cuda_params(spec, False) if len(t.split()[-1]) == 1})
    parts = [f"typedef {c_type} {v};" for v in type_vars]
    for k in kernels:
        parts.append(_cuda_elementwise(k) if k.kind == "elementwise" else _cuda_reduction(k))
    return "\n\n".join(parts) + "\n"


NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit) on PATH; no GPU needed")


def nvcc_compile(source: str, directory) -> subprocess.CompletedProcess:
    """Compile ``source`` to an sm_90 (H200) object: ptxas runs too, no device is touched."""
    path = directory / "kernels.cu"
    path.write_text(source)
    # --std=c++17: what CuPy 14 passes to NVRTC (cupy/_core/_compile_with_cache.pyx, assemble_cupy_compiler_options).
    return subprocess.run([NVCC, "-arch=sm_90", "--std=c++17", "-c", str(path), "-o", str(directory / "kernels.o")],
                          capture_output=True, text=True)


@needs_nvcc
@pytest.mark.parametrize("c_type", ["float", "double"])
def test_kernel_source_compiles_with_nvcc(c_type, tmp_path):
    """Every kernel of CupyKernels in one translation unit, compiled for sm_90 (one nvcc run)."""
    kernels = recorded_kernels()
    assert len(kernels) == 20, [k.name for k in kernels]
    start = time.perf_counter()
    result = nvcc_compile(cuda_translation_unit(kernels, c_type), tmp_path)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, f"nvcc failed for T = {c_type}:\n{result.stderr}"
    print(f"nvcc: {len(kernels)} kernels, T = {c_type}, {seconds:.1f} s")


@needs_nvcc
@pytest.mark.parametrize("kind", ["elementwise", "reduction"])
def test_nvcc_check_fails_on_a_broken_kernel(kind, tmp_path):
    """The check can fail: an undeclared identifier planted in one kernel's body (elementwise operation,
    or a reduction's map expression) makes nvcc reject the unit and name the identifier."""
    kernel = next(k for k in recorded_kernels() if k.kind == kind)
    field = "operation" if kind == "elementwise" else "map_expr"
    kernel.source[field] = kernel.source[field].replace("x", "x_undeclared", 1)
    assert "x_undeclared" in kernel.source[field], kernel.source[field]
    result = nvcc_compile(cuda_translation_unit([kernel], "float"), tmp_path)
    assert result.returncode != 0
    assert "x_undeclared" in result.stderr and "undefined" in result.stderr, result.stderr


# --- the comparisons, shared by both ways ------------------------------------------------------------
RTOL = {np.float32: 2e-5, np.float64: 1e-12}
ATOL = {np.float32: 2e-6, np.float64: 1e-14}


def close(fused, reference, dtype, to_host=np.asarray):
    fused = to_host(fused)
    assert fused.dtype == dtype and fused.shape == reference.shape
    np.testing.assert_allclose(fused, reference, rtol=RTOL[dtype], atol=ATOL[dtype])


def references(fn, *args, **kwargs):
    """``fn`` with the fast tables emptied: every op its reference."""
    with backends.reference_ops():
        return fn(*args, **kwargs)


def compare_table(table, dtype, to_device=np.asarray, to_host=np.asarray):
    """Every entry of a CuPy fast ``table`` against the reference op it replaces, forward and backward;
    and the LAMB optimiser's sum of squares against NumPy's sum."""
    rng = np.random.default_rng(0)

    def draw(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    dev = to_device
    # activations
    x, dy = draw(4, 5, 24, scale=2.0), draw(4, 5, 24)
    for name in ("gelu_new", "gelu"):
        forward, backward = getattr(ops.activations, f"{name}_forward"), getattr(ops.activations, f"{name}_backward")
        y_ref, cache_ref = references(forward, x)
        y, cache = table[forward.fast_key](dev(x))
        close(y, y_ref, dtype, to_host)
        close(table[backward.fast_key](dev(dy), cache), references(backward, dy, cache_ref), dtype, to_host)
    # layer norm
    w, b, dout = draw(24) + 1, draw(24), draw(4, 5, 24)
    out_ref, cache_ref = references(ops.layer_norm_forward, x, w, b, 1e-12)
    out, cache = table[ops.layer_norm_forward.fast_key](dev(x), dev(w), dev(b), 1e-12)
    close(out, out_ref, dtype, to_host)
    dw_ref, db_ref = np.full(24, 0.5, dtype), np.full(24, -0.5, dtype)
    dx_ref = references(ops.layer_norm_backward, dout, cache_ref, dw_ref, db_ref)
    dw, db = dev(np.full(24, 0.5, dtype)), dev(np.full(24, -0.5, dtype))
    close(table[ops.layer_norm_backward.fast_key](dev(dout), cache, dw, db), dx_ref, dtype, to_host)
    close(dw, dw_ref, dtype, to_host)
    close(db, db_ref, dtype, to_host)
    # masked softmax, with and without dropout, for both mask shapes
    scale = 0.125
    raw, dd = draw(2, 3, 6, 6, scale=3.0), draw(2, 3, 6, 6)
    keep = ((rng.random((2, 3, 6, 6)) < 0.8) / 0.8).astype(dtype)
    for mask01 in (rng.random((2, 6)) < 0.7, rng.random((2, 6, 6)) < 0.7):
        mask01[..., 0] = True
        additive = ops.additive_mask_from(mask01, dtype, -10000.0)
        for keep_mask in (None, keep):
            (probs_ref, dropped_ref), cache_ref = references(ops.masked_softmax_forward, raw.copy(), scale, additive,
                                                             keep_mask)
            (probs, dropped), cache = table[ops.masked_softmax_forward.fast_key](
                dev(raw.copy()), scale, dev(additive), None if keep_mask is None else dev(keep_mask))
            close(probs, probs_ref, dtype, to_host)
            close(dropped, dropped_ref, dtype, to_host)
            dscores_ref = references(ops.masked_softmax_backward, dd, cache_ref)
            close(table[ops.masked_softmax_backward.fast_key](dev(dd), cache), dscores_ref, dtype, to_host)
    # the plain softmax (cached decoding): no kernel of its own, the in-place form of backends/numpy_fast.py
    p_ref, cache_ref = references(ops.softmax_forward, raw)
    p, cache = table[ops.softmax_forward.fast_key](dev(raw))
    close(p, p_ref, dtype, to_host)
    close(table[ops.softmax_backward.fast_key](dev(dd), cache), references(ops.softmax_backward, dd, cache_ref),
          dtype, to_host)
    sos = table[sum_of_squares.fast_key]
    close(sos(dev(x)), np.asarray((x * x).sum()), dtype, to_host)    # rows, then their sums
    close(sos(dev(w)), np.asarray((w * w).sum()), dtype, to_host)    # a vector: one reduction


def optimizer_fast(kernels):
    """The NumPy backend's ``fast`` table with the optimisers' fused adapters around ``kernels``
    (None: empty, the reference code), to install with monkeypatch."""
    return {} if kernels is None else optimizer_fast_table(kernels)


def lamb_steps(model_params, grads, kernels, monkeypatch, **preset):
    """Three LAMB steps with the optimisers' fused adapters around ``kernels`` installed in the NumPy
    backend's ``fast`` table (None = the reference code)."""
    monkeypatch.setattr(backends.get("numpy"), "fast", optimizer_fast(kernels))
    params = {k: v.copy() for k, v in model_params.items()}
    opt = Lamb.from_preset(**preset, params=params)
    for step in range(3):
        opt.step({k: g * (1 + step) for k, g in grads.items()})
    monkeypatch.setattr(backends.get("numpy"), "fast", {})
    return params, opt


def test_optimizer_fast_table_keys_are_the_reference_functions(monkeypatch):
    """The table's string keys (backends/ never imports ref_bert) are the references' fast_path keys,
    and a LAMB step with the table installed calls every adapter."""
    refs = [sum_of_squares, lamb.lamb_direction, lamb.lamb_apply]
    table = optimizer_fast_table(CupyKernels(NumpyKernelInterpreter))
    assert set(table) == {f.fast_key for f in refs}
    assert all(f.reference.__module__ + "." + f.reference.__name__ == f.fast_key for f in refs)
    calls = {key: 0 for key in table}

    def counted(key, fn):
        def call(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(backends.get("numpy"), "fast", {k: counted(k, fn) for k, fn in table.items()})
    params = {"encoder.w": np.ones((3, 2)), "encoder.bias": np.zeros(2)}
    Lamb.from_preset("albert", params).step({k: np.full(v.shape, 0.5) for k, v in params.items()})
    assert all(n > 0 for n in calls.values()), calls


# --- everywhere: the kernel source, interpreted ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_source_matches_the_reference_ops(dtype):
    kernels = CupyKernels(NumpyKernelInterpreter)
    compare_table({**fast_table(kernels, backends.get("numpy")), **optimizer_fast_table(kernels)}, dtype)


@pytest.mark.parametrize("preset", ["albert", "tfa", "apex", "torch_optimizer"])
def test_fused_lamb_source_matches_lamb_step(preset, monkeypatch):
    rng = np.random.default_rng(1)
    params = {"encoder.w": rng.standard_normal((6, 4)), "encoder.bias": rng.standard_normal(4),
              "layer_norm.weight": np.zeros(4)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    overrides = {"weight_decay": 0.01} if preset in ("tfa", "torch_optimizer") else {}
    ref, ref_opt = lamb_steps(params, grads, None, monkeypatch, name=preset, **overrides)
    got, got_opt = lamb_steps(params, grads, CupyKernels(NumpyKernelInterpreter), monkeypatch, name=preset,
                              **overrides)
    for name in params:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got_opt.exp_avg_sq[name], ref_opt.exp_avg_sq[name], rtol=1e-12, atol=1e-15)


def test_model_training_step_through_the_fused_paths(monkeypatch):
    """The CuPy backend's fast table over the interpreted kernels (the model ops' and the optimiser's),
    installed as the NumPy backend's: the loss, gradients and updated weights of the reference ops and
    the plain LAMB code (float64, dropout on)."""
    config, inputs = dropout_case(2)
    bk = backends.get("numpy")
    kernels = CupyKernels(NumpyKernelInterpreter)
    results = []
    for fast in ({}, {**fast_table(kernels, backends.get("numpy")), **optimizer_fast_table(kernels)}):
        monkeypatch.setattr(bk, "fast", fast)
        model = Model(config, dtype="float64", seed=0)
        result = model.loss_and_grads(**inputs)
        loss, grads = result.loss, result.grads
        Lamb.from_preset("albert", model.state_dict()).step(grads)
        results.append((float(loss), grads, {k: v.copy() for k, v in model.state_dict().items()}))
    monkeypatch.undo()
    (loss_a, grads_a, params_a), (loss_b, grads_b, params_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=1e-9, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(params_b[name], params_a[name], rtol=1e-12, atol=1e-14, err_msg=name)


# --- on a GPU: the compiled kernels --------------------------------------------------------------------------
gpu = pytest.mark.skipif(not backends.available("cupy"), reason="needs CuPy and a visible GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_fast_table_matches_the_reference_ops(dtype):
    bk = backends.get("cupy")
    assert bk.fast, "the CuPy backend has no fast table (is REF_BERT_FAST=0 set?)"
    compare_table(bk.fast, dtype, to_device=bk.from_host, to_host=bk.to_host)


@pytest.mark.gpu
@gpu
def test_cupy_training_step_matches_numpy():
    """Loss, every gradient and the LAMB-updated weights on CuPy (fused kernels) vs NumPy, float64."""
    config = Config.preset("tiny", vocab_size=50, num_hidden_layers=2)
    rng = np.random.default_rng(4)
    host = dict(input_ids=rng.integers(0, 50, (2, 9)), mlm_labels=np.where(rng.random((2, 9)) < 0.4,
                                                                           rng.integers(0, 50, (2, 9)), -100),
                sop_labels=np.array([1, 0]))
    out = []
    for name in ("numpy", "cupy"):
        model = Model(config, backend=name, dtype="float64", seed=0)
        inputs = {k: model.backend.from_host(v) for k, v in host.items()}
        _result = model.loss_and_grads(**inputs, training=True, dropout_seed=5)
        loss, grads = _result.loss, _result.grads
        Lamb.from_preset("albert", model.state_dict()).step(grads)
        out.append((float(loss), {k: model.backend.to_host(g) for k, g in grads.items()},
                    {k: model.backend.to_host(p) for k, p in model.state_dict().items()}))
    (loss_n, grads_n, params_n), (loss_c, grads_c, params_c) = out
    assert loss_c == pytest.approx(loss_n, rel=1e-10)
    for name in grads_n:
        np.testing.assert_allclose(grads_c[name], grads_n[name], rtol=1e-8, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(params_c[name], params_n[name], rtol=1e-10, atol=1e-13, err_msg=name)
