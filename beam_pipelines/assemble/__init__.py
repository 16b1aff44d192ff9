"""Beam pass 2: generation shards -> the SFT corpus in the paper's variants, measured, and a release.

The package is light on purpose (nothing is imported here): `beam_pipelines.report` reads this
package's statistics without loading the pass."""
