"""The Beam runtime: pipeline options and local workers, progress lines, the driver watch."""
