"""The handoff to training teams: a versioned release folder, its manifest, and its validation.

    ROOT/sft/<version>/data/split=train/part-SSSSS-of-NNNNN.parquet, data/split=validation/part-...
                      (Hive-style: readers of data/ add a `split` column; each split numbered on its
                      own: `number_splits`; older releases hold `[data/]<split>-SSSSS-of-NNNNN.parquet`
                      and validate and load the same way: the manifest lists paths and splits)
                      stats.json, report.html, plots/*.png, README.md (dataset card)
                      manifest.json   every other file: size, sha256, rows; schema version; config;
                                      code revision; input lineage
                      _SUCCESS        written last, after the release validated: the sha256 of
                                      manifest.json (`sha256sum -c _SUCCESS` checks it), so that an
                                      edit of the manifest's config or version fails validate
    ROOT/sft/LATEST                   the release published last (its version name)

`publish` is the protocol, the one way a release is made: name the version; refuse a published
version of another config (releases are never overwritten); clear the debris of a failed run; let the
caller write the data files, stats and report; list them in the manifest; validate; write _SUCCESS;
point LATEST at it. A rerun of the same config finishes what an interrupted publish left: a folder
with a manifest that validates gets its _SUCCESS, a published one is validated again, and LATEST is
written in both cases, so a kill between any two steps never leaves LATEST stale.

This package's face: lifecycle.release.manifest (the manifest: its files, form and seal), lifecycle.release.read
(LATEST followed, a release validated and loaded; `bft validate`, `bft latest`) and
lifecycle.release.publish (the protocol above).
"""
from lifecycle.release.manifest import (MANIFEST, SPLITS, SUCCESS, _VERSION, ReleaseError, check_version_name,
                                   code_revision, config_hash, default_version, describe_file, manifest_problems,
                                   package_version, parquet_rows, read_manifest, sha256_of, success_line,
                                   write_manifest)
from lifecycle.release.publish import HeldRelease, number_splits, publish
from lifecycle.release.read import (LatestConfig, ValidateConfig, data_files, is_published, is_release, latest_data,
                                    latest_name, latest_version, load, parent_of, resolve, validate)

__all__ = ["MANIFEST", "SPLITS", "SUCCESS", "_VERSION", "HeldRelease", "LatestConfig", "ReleaseError", "ValidateConfig",
           "check_version_name", "code_revision", "config_hash", "data_files", "default_version", "describe_file",
           "is_published", "is_release", "latest_data", "latest_name", "latest_version", "parent_of", "load", "manifest_problems", "number_splits",
           "package_version", "parquet_rows", "publish", "read_manifest", "resolve", "sha256_of", "success_line",
           "validate", "write_manifest"]
