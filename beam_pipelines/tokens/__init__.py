"""Token counting: tokenizer proof and shape, exact counts, the length judge, space cuts, the paper's token figures."""
