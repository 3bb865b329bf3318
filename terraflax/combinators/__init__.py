"""The stack algebra: layers compose over a data stack (see `core`)."""

from terraflax.combinators.base import LayerError as LayerError
from terraflax.combinators.base import Layer as Layer
from terraflax.combinators.base import MODES as MODES
from terraflax.combinators.base import check_mode as check_mode
from terraflax.combinators.core import Add as Add
from terraflax.combinators.core import Branch as Branch
from terraflax.combinators.core import Concatenate as Concatenate
from terraflax.combinators.core import Drop as Drop
from terraflax.combinators.core import Dup as Dup
from terraflax.combinators.core import Fn as Fn
from terraflax.combinators.core import Multiply as Multiply
from terraflax.combinators.core import Parallel as Parallel
from terraflax.combinators.core import Residual as Residual
from terraflax.combinators.core import Select as Select
from terraflax.combinators.core import Serial as Serial
from terraflax.combinators.core import Swap as Swap
from terraflax.combinators.scan import Chunk as Chunk
from terraflax.combinators.scan import Repeat as Repeat
from terraflax.combinators.reversible import MergeStreams as MergeStreams
from terraflax.combinators.reversible import ReversibleHalfResidual as ReversibleHalfResidual
from terraflax.combinators.reversible import ReversibleLayer as ReversibleLayer
from terraflax.combinators.reversible import ReversibleSerial as ReversibleSerial
from terraflax.combinators.reversible import ReversibleSwap as ReversibleSwap
