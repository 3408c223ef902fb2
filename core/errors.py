"""The base of every error a user can cause and fix.

Entry points (`python -m train`, `python -m serving`, `python -m chat.ratings`, the app) catch
`UserError` and print its message, one sentence naming the cause and the fix, instead of a
traceback; anything else is a bug and keeps its traceback. Each room derives its own kinds
(ConfigError, ModelError, DataError, RatingsError, EngineError) so messages stay specific.
"""


class UserError(Exception):
    """Something the user passed cannot be used; str(error) says why and what to pass instead."""
