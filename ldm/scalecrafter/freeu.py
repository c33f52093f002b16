"""FreeU (placeholder until implemented): a no-op context manager."""
from contextlib import contextmanager


@contextmanager
def freeu_applied(unet, params):
    if params is not None:
        raise NotImplementedError("--freeu is not implemented yet")
    yield
