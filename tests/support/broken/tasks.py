"""A task module that cannot be imported: the worker must refuse to start, naming it."""

raise RuntimeError("this module is broken on purpose")
