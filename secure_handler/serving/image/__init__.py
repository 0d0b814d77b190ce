"""serving/image"""
