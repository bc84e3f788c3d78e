//! Which topic an event is published to. The topic is the chosen attribute as is, so the core
//! router's wildcards apply to it directly:
//!
//! * `type` (default), reverse-DNS by convention (`com.github.push`): NATS-style patterns on
//!   `.` tokens, e.g. `com.github.*` (one token) or `com.github.>` (the rest).
//! * `source`, a URI-reference (`/sensors/tn-1`, `https://github.com/org/repo`): MQTT-style
//!   patterns on `/` levels, e.g. `/sensors/+` or `https://github.com/org/#`.
//! * `subject`: whichever fits its shape.
//!
//! A topic that is itself a wildcard pattern (a type `com.*.push`) is refused: publishing to a
//! pattern would match subscriptions it was never meant for.

use super::event::CloudEvent;
use super::CeError;

/// The attribute an event is routed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteBy {
    #[default]
    Type,
    Source,
    Subject,
}

impl RouteBy {
    /// The config spelling (`route_by = "type"`).
    pub fn name(self) -> &'static str {
        match self {
            RouteBy::Type => "type",
            RouteBy::Source => "source",
            RouteBy::Subject => "subject",
        }
    }

    /// Parses the config spelling.
    pub fn parse(name: &str) -> Option<RouteBy> {
        match name {
            "type" => Some(RouteBy::Type),
            "source" => Some(RouteBy::Source),
            "subject" => Some(RouteBy::Subject),
            _ => None,
        }
    }
}

/// The topic `event` is published to under `by`, or a 400 when the event has no such attribute
/// or its value is a wildcard pattern.
pub fn topic_for(event: &CloudEvent, by: RouteBy) -> Result<&str, CeError> {
    let topic = match by {
        RouteBy::Type => event.ty.as_str(),
        RouteBy::Source => event.source.as_str(),
        RouteBy::Subject => match event.subject.as_deref() {
            Some(subject) if !subject.is_empty() => subject,
            _ => {
                return Err(CeError::bad_request(format!(
                    "event {:?} has no subject, and this route publishes by subject: give the \
                     event a subject (or route this endpoint by type)",
                    event.id
                )))
            }
        },
    };
    let wildcard = topic
        .split('.')
        .find(|token| matches!(*token, "*" | ">"))
        .or_else(|| topic.split('/').find(|level| matches!(*level, "+" | "#")));
    if let Some(wildcard) = wildcard {
        return Err(CeError::bad_request(format!(
            "event {} {topic:?} contains the wildcard token {wildcard:?}: it is the topic the \
             event is published to, and wildcards are for subscriptions; use a concrete {}",
            by.name(),
            by.name()
        )));
    }
    Ok(topic)
}
