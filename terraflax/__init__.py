"""terraflax: efficient Transformers from stack combinators, on JAX and Flax."""

__version__ = '0.1.0'
