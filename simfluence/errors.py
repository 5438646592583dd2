"""The base of the science package's bad-input errors (light: importing it loads nothing else)."""


class SimfluenceError(ValueError):
    """Bad input to the science package: shapes, ids, curricula, hyperparameters. Every error
    the package raises for its caller's input subclasses it; the message names what is wrong."""
