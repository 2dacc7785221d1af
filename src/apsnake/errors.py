"""The base class of errors caused by bad input (not by bugs).

Scripts catch these, log one clear line naming the data ID, the file and the problem,
and exit non-zero without a traceback; any other exception is a bug and keeps its traceback.
"""


class ApsnakeError(Exception):
    """Bad or missing input: the message names the data ID and/or file and the problem."""
