"""The Beam passes of the product: prepare (Dolma -> candidates) and assemble (generations -> SFT)."""
