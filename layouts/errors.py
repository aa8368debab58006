"""The contract's one error type."""


class LayoutError(ValueError):
    """A layout that is missing, incomplete, corrupt or from an unknown format version."""
