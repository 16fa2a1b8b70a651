"""Phase 4 (optional): recaption the kept rows with a vision-language model."""
