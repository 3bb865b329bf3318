"""Model factories: CamelCase functions with keyword-only hyperparameters returning a layer."""

from terraflax.models.transformer import Transformer as Transformer
from terraflax.models.transformer import TransformerEncoder as TransformerEncoder
from terraflax.models.transformer import TransformerLM as TransformerLM
