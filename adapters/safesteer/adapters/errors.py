"""Errors of the adapter toolkit. The server maps each type to an HTTP status in one place."""


class AdapterError(Exception):
    """Base class: an adapter cannot be used as asked."""


class AdapterFormatError(AdapterError):
    """The file is not a readable safesteer adapter (not safetensors, missing fields, ...)."""


class AdapterIntegrityError(AdapterError):
    """The tensor payload does not match the sha256 recorded in the metadata."""


class AdapterMismatch(AdapterError):
    """The adapter was built for another model: names the field, expected and found values."""

    def __init__(self, field: str, expected: object, found: object) -> None:
        self.field = field
        self.expected = expected
        self.found = found
        super().__init__(
            f"adapter does not fit the served model: {field} is {found!r} in the adapter, "
            f"the model needs {expected!r}"
        )


class UnknownCategory(AdapterError):
    """A harm category that the adapter does not define."""

    def __init__(self, category: str, known: list[str]) -> None:
        self.category = category
        self.known = known
        super().__init__(f"unknown safety category {category!r}; known: {', '.join(known)}")


class ModelLoadError(Exception):
    """A model source cannot be resolved or loaded."""
