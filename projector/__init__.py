"""projector"""
