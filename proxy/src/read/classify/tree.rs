//! A generic mirror of pg_query's protobuf parse tree, built through the `Serialize`
//! impls pg_query derives on every protobuf type.
//!
//! Why: pg_query's own `nodes()` iterator visits only a subset of node types (it
//! misses VALUES lists, LIMIT, window definitions, FILTER, RETURNING, ON CONFLICT …),
//! and a hand-written visitor over ~270 node types would silently miss whatever it
//! forgets. Going through serde makes the walk exhaustive by construction: every
//! field of every node becomes a child here, named by its Rust struct and field name.
//!
//! Invariants: struct names are the protobuf message names (`RangeVar`, `FuncCall`,
//! `SqlValueFunction` …); the `Node` envelope and oneof variants (`node::Node`,
//! `a_const::Val`) are transparent, so a node appears as its message struct whether
//! it sits in a `Node` or in a typed field.
//! Depth is bounded by prost's decode recursion limit (100 messages), so the
//! recursion here and in `walk` is bounded too.

use serde::Serialize;
use serde::ser::{self, Impossible};

/// One value of the parse tree.
#[derive(Debug)]
pub(super) enum Tree {
    /// A protobuf message: its struct name and fields in declaration order.
    Struct(&'static str, Vec<(&'static str, Tree)>),
    Seq(Vec<Tree>),
    Str(String),
    Bool(bool),
    /// Numbers, `None`, units: nothing the walk looks at.
    Other,
}

#[derive(Debug, thiserror::Error)]
#[error("parse tree conversion: {0}")]
pub(super) struct TreeError(String);

impl ser::Error for TreeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

/// Converts any pg_query protobuf value into a [`Tree`].
pub(super) fn of<T: Serialize + ?Sized>(value: &T) -> Result<Tree, TreeError> {
    value.serialize(ToTree)
}

impl Tree {
    /// The field `name` of a struct, if this is a struct that has it.
    pub(super) fn field(&self, name: &str) -> Option<&Tree> {
        match self {
            Tree::Struct(_, fields) => field(fields, name),
            _ => None,
        }
    }

    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Tree::Str(s) => Some(s),
            _ => None,
        }
    }
}

pub(super) fn field<'t>(fields: &'t [(&'static str, Tree)], name: &str) -> Option<&'t Tree> {
    fields.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
}

struct ToTree;

pub(super) struct SeqBuilder(Vec<Tree>);

pub(super) struct StructBuilder {
    name: &'static str,
    fields: Vec<(&'static str, Tree)>,
}

impl ser::Serializer for ToTree {
    type Ok = Tree;
    type Error = TreeError;
    type SerializeSeq = SeqBuilder;
    type SerializeTuple = SeqBuilder;
    type SerializeTupleStruct = SeqBuilder;
    type SerializeTupleVariant = SeqBuilder;
    // The protobuf types have no maps.
    type SerializeMap = Impossible<Tree, TreeError>;
    type SerializeStruct = StructBuilder;
    type SerializeStructVariant = StructBuilder;

    fn serialize_bool(self, v: bool) -> Result<Tree, TreeError> {
        Ok(Tree::Bool(v))
    }
    fn serialize_i8(self, _: i8) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_i16(self, _: i16) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_i32(self, _: i32) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_i64(self, _: i64) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_u8(self, _: u8) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_u16(self, _: u16) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_u32(self, _: u32) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_u64(self, _: u64) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_f32(self, _: f32) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_f64(self, _: f64) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_char(self, v: char) -> Result<Tree, TreeError> {
        Ok(Tree::Str(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Tree, TreeError> {
        Ok(Tree::Str(v.to_owned()))
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_none(self) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Tree, TreeError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<Tree, TreeError> {
        Ok(Tree::Other)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<Tree, TreeError> {
        value.serialize(self)
    }
    /// Oneof variants (`Node::RangeVar(RangeVar)`): transparent, the inner struct
    /// carries the node's name.
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<Tree, TreeError> {
        value.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqBuilder, TreeError> {
        Ok(SeqBuilder(Vec::with_capacity(len.unwrap_or(0))))
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqBuilder, TreeError> {
        Ok(SeqBuilder(Vec::with_capacity(len)))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<SeqBuilder, TreeError> {
        Ok(SeqBuilder(Vec::with_capacity(len)))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        len: usize,
    ) -> Result<SeqBuilder, TreeError> {
        Ok(SeqBuilder(Vec::with_capacity(len)))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, TreeError> {
        Err(ser::Error::custom("unexpected map in parse tree"))
    }
    fn serialize_struct(self, name: &'static str, len: usize) -> Result<StructBuilder, TreeError> {
        Ok(StructBuilder {
            name,
            fields: Vec::with_capacity(len),
        })
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<StructBuilder, TreeError> {
        Ok(StructBuilder {
            name: variant,
            fields: Vec::with_capacity(len),
        })
    }
}

impl SeqBuilder {
    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        self.0.push(value.serialize(ToTree)?);
        Ok(())
    }
}

impl ser::SerializeSeq for SeqBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        self.push(value)
    }
    fn end(self) -> Result<Tree, TreeError> {
        Ok(Tree::Seq(self.0))
    }
}

impl ser::SerializeTuple for SeqBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        self.push(value)
    }
    fn end(self) -> Result<Tree, TreeError> {
        Ok(Tree::Seq(self.0))
    }
}

impl ser::SerializeTupleStruct for SeqBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        self.push(value)
    }
    fn end(self) -> Result<Tree, TreeError> {
        Ok(Tree::Seq(self.0))
    }
}

impl ser::SerializeTupleVariant for SeqBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        self.push(value)
    }
    fn end(self) -> Result<Tree, TreeError> {
        Ok(Tree::Seq(self.0))
    }
}

impl ser::SerializeStruct for StructBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), TreeError> {
        self.fields.push((key, value.serialize(ToTree)?));
        Ok(())
    }
    /// `Node { node: Option<node::Node> }` is only the oneof's envelope: it becomes
    /// the node itself.
    fn end(mut self) -> Result<Tree, TreeError> {
        if self.name == "Node"
            && matches!(self.fields.as_slice(), [("node", _)])
            && let Some((_, inner)) = self.fields.pop()
        {
            return Ok(inner);
        }
        Ok(Tree::Struct(self.name, self.fields))
    }
}

impl ser::SerializeStructVariant for StructBuilder {
    type Ok = Tree;
    type Error = TreeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), TreeError> {
        self.fields.push((key, value.serialize(ToTree)?));
        Ok(())
    }
    fn end(self) -> Result<Tree, TreeError> {
        Ok(Tree::Struct(self.name, self.fields))
    }
}
