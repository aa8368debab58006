"""Generation with routed experts streamed from a layout."""


def load(path_or_repo, **options):
    """See ``flashmoe.runtime.loader.load``."""
    from .loader import load as _load

    return _load(path_or_repo, **options)


__all__ = ["load"]
