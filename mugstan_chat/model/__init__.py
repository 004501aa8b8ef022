"""Mug-STAN itself"""
