"""The paper's own figures (Nguyen et al. 2024), the one copy: the
report puts them beside a release's numbers, and `bft plan` takes the score-5 share as the gate's
prior where nothing is measured yet. Table 6: average lengths in Llama-2 tokens (instruction,
response) per data variant; the score validity and the score-5 share of the scored pool; the share
of the Common Crawl subset removed as too long. Figure 3 (trigrams) is published as a plot only: no
number to put beside ours."""

PAPER = "https://arxiv.org/abs/2408.04614"
PAPER_TABLE6 = {"filter": ("Dolma + filtering", 69, 499), "rewrite": ("Dolma + rewriting", 58, 449),
                "filter+rewrite": ("Dolma + filtering + rewriting", 69, 468),
                "filter+distill": ("Dolma + filtering + distilling", 69, 567)}
PAPER_SCORE_VALID = 0.88     # the regex-extracted score is valid (1..5) 88% of the time
PAPER_SCORE5_SHARE = 0.136   # score 5 makes up 13.6% of the pool (70B forward model, Dolma's head split)
PAPER_TOO_LONG_SHARE = 0.25  # about 25% of the Common Crawl subset removed as too long
