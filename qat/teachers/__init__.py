"""Distillation teachers (loading, tokenizer compatibility) and their cached top-k logits."""

from qat.teachers.load import Teacher, TeacherConfig, check_same_tokenizer, load_teacher, teacher_fingerprint

__all__ = ["Teacher", "TeacherConfig", "check_same_tokenizer", "load_teacher", "teacher_fingerprint"]
