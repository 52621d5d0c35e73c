"""benchmarks/bench_gemm.py: the products it reads from a jaxpr are the ones computed (a scan's
body counted `length` times), each one's canonical (B, M, K, N) is the product's, and the
whole benchmark runs in its seconds-long mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bench_gemm as bench

# (lhs shape, rhs shape, dimension_numbers): plain, transposed operands, batch dims, several
# contracting and free axes; every dimension differs.
PRODUCTS = [
  ((5, 7), (7, 3), (((1,), (0,)), ((), ()))),
  ((7, 5), (3, 7), (((0,), (1,)), ((), ()))),
  ((2, 5, 7), (2, 7, 3), (((2,), (1,)), ((0,), (0,)))),
  ((4, 6, 2, 5), (4, 3, 5, 2), (((3, 2), (2, 3)), ((0,), (0,)))),
  ((6, 2, 9), (6, 4), (((0,), (0,)), ((), ()))),
]


@pytest.mark.parametrize("lhs,rhs,dn", PRODUCTS)
def test_canonical_shape_is_the_products(lhs, rhs, dn):
  """Moving each operand's axes to (batch, free, contracting) / (batch, contracting, free)
  and merging them gives a (B, M, K) x (B, K, N) matmul equal to the dot_general."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal(lhs).astype(np.float32)
  b = rng.standard_normal(rhs).astype(np.float32)
  want = np.asarray(jax.lax.dot_general(a, b, dn, precision="highest"))
  nb, m, k, n = bench.canonical_shape(lhs, rhs, dn)
  (lc, rc), (lb, rb) = dn
  free_l = [i for i in range(len(lhs)) if i not in lc and i not in lb]
  free_r = [i for i in range(len(rhs)) if i not in rc and i not in rb]
  a3 = a.transpose([*lb, *free_l, *lc]).reshape(nb, m, k)
  b3 = b.transpose([*rb, *rc, *free_r]).reshape(nb, k, n)
  np.testing.assert_allclose((a3 @ b3).reshape(want.shape), want, rtol=1e-5, atol=1e-5)


def test_products_are_counted_through_jit_and_scan():
  def f(x, ws, v):
    def body(c, w):
      return jnp.tanh(c @ w), None

    y, _ = jax.lax.scan(body, x, ws)  # 4 products of (3, 5) x (5, 5)
    inner = jax.jit(lambda a: a @ v)  # one (3, 5) x (5, 2), inside a pjit
    return inner(y) + jnp.einsum("ij,kj->ik", x, jnp.ones((6, 5)))[:, :2]

  x, ws, v = jnp.ones((3, 5)), jnp.ones((4, 5, 5)), jnp.ones((5, 2))
  counts = bench.count_products(jax.make_jaxpr(f)(x, ws, v).jaxpr)
  by_shapes = {(k[0], k[1]): n for k, n in counts.items()}
  assert by_shapes == {((3, 5), (5, 5)): 4, ((3, 5), (5, 2)): 1, ((3, 5), (6, 5)): 1}


def test_a_product_inside_a_while_loop_is_refused():
  def f(x):
    return jax.lax.while_loop(lambda c: c[0, 0] < 10.0, lambda c: c @ c, x)

  with pytest.raises(ValueError, match="inside a while"):
    bench.count_products(jax.make_jaxpr(f)(jnp.ones((3, 3))).jaxpr)


def test_tiny_case_runs_both_sides(capsys):
  summary = bench.main(["--case", "train_tiny", "--runs", "1"])
  out = capsys.readouterr().out
  assert all(np.isfinite(v) and v > 0 for v in summary.values())
  assert "our products, XLA:CPU kernels" in out and "torch's whole step" in out


@pytest.mark.parametrize("argv", [["--case", "nope"], ["--runs", "0"]])
def test_bad_arguments_are_refused(argv):
  with pytest.raises(SystemExit):
    bench.main(argv)
