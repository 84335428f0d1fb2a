"""The one exception type of config mistakes."""
from __future__ import annotations

class ConfigError(ValueError):
    """A user mistake in a config key, a config file or a path it names (a ValueError, so
    ``except ValueError`` keeps working). ``key``: the config key (or ``config`` for the file
    itself); ``source``: the file the value came from, when it came from one. The CLI prints
    these as one line (exit 2), never with a traceback."""

    def __init__(self, key, msg, source=None):
        self.key, self.msg, self.source = key, msg, source
        super().__init__((f"{source}: " if source else "") + f"{key}: {msg}")

    def with_source(self, source) -> "ConfigError":
        """The same error, naming the file the offending value was read from."""
        return ConfigError(self.key, self.msg, source)


def _fail(key, msg):
    raise ConfigError(key, msg)
