"""Model factories: CamelCase functions with keyword-only hyperparameters returning a layer."""

from terraflax.models.transformer import Transformer as Transformer
from terraflax.models.transformer import TransformerEncoder as TransformerEncoder
from terraflax.models.transformer import TransformerLM as TransformerLM
from terraflax.models.reformer import Reformer as Reformer
from terraflax.models.reformer import ReformerLM as ReformerLM
