"""The error type for bad input: raised before expensive work, caught by `__main__` (exit code 2)."""


class ConfigError(ValueError):
    """A config value or input that is invalid; the message names the key, the value and what is valid."""
