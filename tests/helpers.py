from modeling_detr_custom.testing_utils import *  # noqa  (temporary shim for `from helpers import`, removed at merge)
from modeling_detr_custom.testing_utils import EMBEDDING_TABLES, TINY, padded_batch, randomize_, tiny_kwargs  # noqa
