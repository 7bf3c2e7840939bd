import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.compress import round_ste, straight_through


def test_round_ste_forward_rounds_half_to_even():
    x = jnp.array([-1.5, -0.5, 0.4, 0.5, 0.6, 1.5, 2.5])
    np.testing.assert_array_equal(round_ste(x), [-2.0, -0.0, 0.0, 0.0, 1.0, 2.0, 2.0])


def test_round_ste_gradient_is_identity_under_grad_jit_vmap():
    f = lambda x: jnp.sum(round_ste(x * 3.0) ** 2)
    x = jnp.array([0.2, 0.4, 1.1])
    expected = [6.0, 6.0, 18.0]  # d/dx round(3x)^2 with round' := 1 is 2 * round(3x) * 3
    np.testing.assert_allclose(jax.grad(f)(x), expected)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), expected)
    np.testing.assert_allclose(jax.grad(jax.jit(f))(x), expected)
    np.testing.assert_allclose(jax.vmap(jax.grad(f))(x[:, None]), np.array(expected)[:, None])
    # Plain rounding has a zero gradient: the STE is what makes training through it possible.
    assert float(jnp.abs(jax.grad(lambda x: jnp.sum(jnp.round(x * 3.0) ** 2))(x)).sum()) == 0.0


def test_straight_through_any_fn_forward_value_and_identity_vjp():
    fn = lambda x: jnp.sign(x) * jnp.floor(jnp.abs(x) * 4) / 4
    x = jnp.linspace(-2.0, 2.0, 17)
    y, vjp = jax.vjp(lambda x: straight_through(fn, x), x)
    np.testing.assert_array_equal(y, fn(x))
    g = jnp.arange(17.0)
    np.testing.assert_array_equal(vjp(g)[0], g)
