"""The error a user's mistake raises: `ConfigError`, whose message names the field, the value and
the fix. It lives apart from `plait.config` so that the pure layers below the config tree (the
layout rules) raise the same error without importing it."""


class ConfigError(ValueError):
    """A user mistake in the config: the message names the field, the value and the fix."""
