"""serving/text"""
