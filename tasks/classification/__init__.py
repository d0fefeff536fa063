"""Image classification (ImageNet, any ImageFolder) with MobileOne."""
