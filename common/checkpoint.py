"""The stable Python interface to trained weights: ``load_encoder(CKPT) -> ASTEncoder``.

``CKPT`` is anything ``--init`` takes for the AST family: a run directory, an exported model file of this
package, an official SSAST or AST ``.pth``, timm ViT weights or a Hugging Face AST directory. The encoder comes
back on the CPU in float32; ``encoder.forward_features(x)`` takes a normalised fbank ``[B, T, F]``
(``common.frontend``) and returns every token after the final norm, prefix tokens first, ``[B, prefix + N, D]``.

The implementation lives with the weight formats (``common/models/weights.py``); this module is the import path
that code outside the package is promised and keeps working when the package's insides move.
"""

from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.weights import load_encoder, load_encoder_state

__all__ = ["ASTEncoder", "EncoderConfig", "load_encoder", "load_encoder_state"]
