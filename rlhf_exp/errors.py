"""Errors that mean "the input is wrong", reported as one clear line instead of a traceback."""


class UserInputError(ValueError):
    """Bad input from the user: a config value, a data file, a field. The message names it."""


class ConfigError(UserInputError):
    """A config key holds a value that cannot work. The message names the key."""

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config key `{key}`: {problem}")


class DataError(UserInputError):
    """A data file is missing or malformed. The message names the file and, where known, the line."""

    def __init__(self, path, problem: str, line: int | None = None):
        self.path, self.line = str(path), line
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
