"""COCO data: instances and images (coco), crop views (transforms, views), synthetic data set (synthetic)."""
