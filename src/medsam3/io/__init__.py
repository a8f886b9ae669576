"""Reading and writing medical images: one :class:`~medsam3.image.Image` type in, geometry restored out."""
