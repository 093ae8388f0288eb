"""The exceptions `models` raises. Each message names the file or value that was wrong and what to do about it."""


class ModelsError(Exception):
    """Root of every error raised by `models`."""


class WeightsError(ModelsError):
    """A weights file or manifest is missing, unreadable, corrupt or does not match its checksum."""


class DatasetError(ModelsError):
    """A dataset folder, label file or mask is not in the expected layout."""


class ImageError(ModelsError, ValueError):
    """An image the models cannot take (wrong shape, type, or content)."""
