"""The ViT family of AST and SSAST: the encoder, its resize rules, its Architecture, its official weights."""
