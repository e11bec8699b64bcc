//! The problem+json answers many operations share, declared once as reusable OpenAPI responses
//! (`components.responses`): an operation names one (`response = responses::AdminTokenRefused`)
//! instead of repeating its line. An answer particular to one operation keeps its own line, with
//! its own words.
//!
//! These types exist for their OpenAPI description only: the answers themselves are built by
//! [`super::error::ApiError`].
#![allow(dead_code)]

use super::error::Problem;

macro_rules! problem_responses {
    ($($(#[$doc:meta])* $name:ident = $description:literal;)*) => {
        $(
            $(#[$doc])*
            #[derive(utoipa::ToResponse)]
            #[response(description = $description, content_type = "application/problem+json")]
            pub(crate) struct $name(Problem);
        )*

        /// Every shared response, for the document's components.
        pub(crate) fn all() -> Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::response::Response>)> {
            use utoipa::ToResponse;
            vec![$($name::response()),*]
                .into_iter()
                .map(|(name, response)| (name.to_string(), response))
                .collect()
        }
    };
}

problem_responses! {
    /// 400 on a body that is not JSON.
    BadJson = "malformed JSON or no JSON content type";
    /// 401 on an admin operation.
    AdminTokenRefused = "the admin token is missing or wrong";
    /// 401 on a user's operation.
    UserTokenRefused = "no, an expired or an invalid user token";
    /// 403 on a user's operation.
    NotTheTokensUser = "the user id is not the token's";
    /// 404 on a sale's item.
    NoSuchSaleOrItem = "no such sale or item";
    /// 413 on a body over the limit.
    BodyTooLarge = "the body is too large";
    /// 422 on a field out of its range.
    FieldOutOfRange = "a field is out of range";
    /// 503 when the config group (sales, moves, the shard map) cannot be reached.
    ConfigGroupUnavailable = "the config group is unavailable";
    /// 503 on a group that cannot be reached.
    GroupUnavailable = "a group is unavailable";
    /// 503 when the engine sheds load or a group cannot be reached.
    Unavailable = "overloaded or unavailable";
    /// 503 when the engine sheds load or one of several groups cannot be reached.
    OverloadedOrGroupUnavailable = "overloaded or a group unavailable";
}
