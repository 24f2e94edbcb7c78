"""One module per backend; each exposes ``BACKEND``, an instance of ``base.Backend``."""
