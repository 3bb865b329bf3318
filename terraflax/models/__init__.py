"""Model factories: CamelCase functions with keyword-only hyperparameters returning a layer."""

from terraflax.models.bert import BertMLM as BertMLM
from terraflax.models.concat_terraformer import ConcatTerraformer as ConcatTerraformer
from terraflax.models.fnet import FNet as FNet
from terraflax.models.reformer import Reformer as Reformer
from terraflax.models.reformer import ReformerLM as ReformerLM
from terraflax.models.terraformer import Terraformer as Terraformer
from terraflax.models.terraformer import TerraformerLM as TerraformerLM
from terraflax.models.transformer import Transformer as Transformer
from terraflax.models.transformer import TransformerEncoder as TransformerEncoder
from terraflax.models.transformer import TransformerLM as TransformerLM
from terraflax.models.vit import ViT as ViT
