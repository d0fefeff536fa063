"""Lightning tasks (classification, detection, segmentation) built on the MobileOne backbone."""
