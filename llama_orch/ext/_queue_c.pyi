"""Type stub: the compiled ``_queue_c`` has exactly the API of its twin ``_queue_py``."""

from ._queue_py import AdmissionQueue as AdmissionQueue

__all__ = ["AdmissionQueue"]
