"""Work started in a daemon thread at once and collected later: checkpoint hashing, weights
copied to the device while the model is built, device libraries warmed up. Worth it where the
work releases the GIL (file reads, hashlib, host-to-device copies, device calls)."""
import threading


class InBackground:
    """fn(*args) running in a daemon thread named `name`; :meth:`result` waits for it and
    returns its value, or re-raises its error."""

    def __init__(self, fn, *args, name: str):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True,
                                        name=name)
        self._thread.start()

    def _run(self, fn, args):
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
