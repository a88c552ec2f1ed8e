import keras
import pytest


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Every test starts from the float32 policy and a fixed seed."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()


if keras.backend.backend() == "jax":
    import jax

    # float64 must really be float64 for the dtype tests.
    jax.config.update("jax_enable_x64", True)
