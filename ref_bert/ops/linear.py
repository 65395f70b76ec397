"""Dense (fully connected) layer.

Forward:   out = x @ W + b            x: (..., n_in)   W: (n_in, n_out)   b: (n_out,)   out: (..., n_out)

Backward, with dout = dL/dout of shape (..., n_out) and X, D the inputs and upstream gradients
flattened to rows (N, n_in) and (N, n_out):
    out[n, j] = sum_i X[n, i] W[i, j] + b[j]
    dL/dX[n, i] = sum_j D[n, j] W[i, j]     ->  dx = dout @ W^T
    dL/dW[i, j] = sum_n X[n, i] D[n, j]     ->  dW += X^T @ D
    dL/db[j]    = sum_n D[n, j]             ->  db += D.sum(axis=0)

Weights are stored (n_in, n_out) so that the forward reads ``x @ W``; Hugging Face's nn.Linear stores
the transpose (n_out, n_in) and the checkpoint mapping transposes.

Every product is taken on the flattened 2-D rows, (N, n_in) @ (n_in, n_out): ``matmul`` on a
(B, T, n_in) array would run B separate (T, n_in) products (NumPy loops over the leading axes), which
OpenBLAS runs 10-15% slower on one thread and far slower on several.
"""
from __future__ import annotations


def linear_forward(x, weight, bias):
    """Return ``(x @ weight + bias, cache)``."""
    n_in, n_out = weight.shape
    out = x.reshape(-1, n_in) @ weight
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], n_out), (x, weight)


def linear_backward(dout, cache, dweight=None, dbias=None):
    """Accumulate ``dweight += x^T dout`` and ``dbias += sum(dout)`` (when given); return dx."""
    x, weight = cache
    n_in, n_out = weight.shape
    rows = dout.reshape(-1, n_out)
    if dweight is not None:
        dweight += x.reshape(-1, n_in).T @ rows
    if dbias is not None:
        dbias += rows.sum(axis=0)
    return (rows @ weight.T).reshape(*dout.shape[:-1], n_in)
