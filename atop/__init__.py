"""AToP adversarial-defense service: the ``atop`` command and the small shared contract."""

__version__ = "0.1.0"
