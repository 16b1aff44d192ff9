"""What a data team reads before training: report.html with PNG plots, and the dataset card
(README.md with the Hugging Face YAML header), both written from the release's stats.json alone
(schemas.release_stats.ReleaseStats).

The report, top to bottom: provenance (config, models, code revision, links to the card, manifest
and stats), the whole funnel from Dolma records to train/validation in one table and one plot,
per-stage request statistics, score distributions per scoring stage (kept vs dropped), lengths and
diversity comparable across origins (normalized histograms, unique trigrams on a fixed-size sample),
decontamination (each evaluation set, and every pair dropped with the n-gram it shares), example
rows (kept pairs and one dropped row per drop reason), and a sample to browse (stratified by origin and
score bucket) with a filter box, the page's one script (allowed by its hash in the CSP).

In parts: `numbers` (the tables and figures, pure functions of the stats), `plots` (matplotlib),
`page` (report.html from page_template.html), `card` (README.md from card_template.md), `paper`
(the paper's own figures), `changes` (what changed since the parent release, and the alerts). This
package's face is the two writers assemble calls.
"""
from beam_pipelines.report.card import write_card  # noqa: F401
from beam_pipelines.report.page import write_report  # noqa: F401
