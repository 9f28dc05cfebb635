"""F-LMM: pixel grounding for frozen HuggingFace large multimodal models."""

import logging

# torchao (the `quant` extra), which transformers imports at every start once it is installed,
# registers enums as pytree constants in a way torch 2.14 deprecates: two warning lines per
# process that no user can act on (torchao 0.15-0.16 print one about their C++ kernels instead)
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage()
)
