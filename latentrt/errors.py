"""Exception types. Each names the problem; all are ValueError subclasses except the numeric one."""


class LatentRTError(Exception):
    """Base class of every error latentrt raises on purpose."""


class ConfigError(LatentRTError, ValueError):
    """config.json (or a load() override) is missing a field, has a bad value or an unknown name."""


class CheckpointError(LatentRTError, ValueError):
    """Weights are missing, unexpected, misshaped or unreadable."""


class InputError(LatentRTError, ValueError):
    """A bad argument to logits() / generate(): prompt, step count, criterion, markers..."""


class NonFiniteStateError(LatentRTError, FloatingPointError):
    """A latent state or logits became NaN/inf; generation stops rather than return garbage."""


def is_choice(value, choices) -> bool:
    """Whether ``value`` names one of ``choices`` (a registry's keys). Only a string can: any other value, an
    unhashable list or dict from a JSON request or config file included, is not one (where a plain ``in``
    on a dict would raise TypeError instead of the caller's error naming the choices)."""
    return isinstance(value, str) and value in choices
