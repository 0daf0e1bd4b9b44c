"""The one error type users see.

Every failure caused by the user's input (config, data, paths, flags) is raised as `PosttrainError` with a
message that names the file/line/key and says how to fix it. The CLI prints it as one line and exits 2;
anything else that escapes is a bug in posttrain and keeps its traceback.
"""


class PosttrainError(Exception):
    """A user-facing error: one line, naming the culprit and the fix."""
