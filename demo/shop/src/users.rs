//! `user-service`: `POST /users`, `GET /users/{id}`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use switchboard_service::{Service, ServiceBuilder};

use crate::problem;

/// The service's name in the registry.
pub const SERVICE: &str = "user-service";

/// A user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// `usr_` and 12 hex digits.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Email address.
    pub email: String,
}

/// The body of `POST /users`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Display name, 1 to 100 characters.
    pub name: String,
    /// Email address; must contain `@`.
    pub email: String,
}

/// The users "database": shared by every instance of the service in this process.
#[derive(Debug, Clone, Default)]
pub struct Users {
    users: Arc<Mutex<HashMap<String, User>>>,
}

impl Users {
    /// Creates a user.
    pub fn create(&self, new: NewUser) -> Result<User, String> {
        let name = new.name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err("name must be 1 to 100 characters".into());
        }
        if !new.email.contains('@') {
            return Err("email must contain @".into());
        }
        let user = User {
            id: crate::new_id("usr"),
            name: name.to_owned(),
            email: new.email,
        };
        self.users.lock().insert(user.id.clone(), user.clone());
        tracing::info!(user_id = %user.id, "user created");
        Ok(user)
    }

    /// A user by id.
    pub fn get(&self, id: &str) -> Option<User> {
        self.users.lock().get(id).cloned()
    }
}

/// The service, ready for its registry and bus to be set.
pub fn service(users: Users) -> ServiceBuilder {
    Service::builder(SERVICE)
        .version(crate::VERSION)
        .router(router(users))
}

/// The service's routes.
pub fn router(users: Users) -> Router {
    Router::new()
        .route("/users", post(create))
        .route("/users/{id}", get(read))
        .with_state(users)
}

async fn create(State(users): State<Users>, Json(new): Json<NewUser>) -> Response {
    match users.create(new) {
        Ok(user) => (StatusCode::CREATED, Json(user)).into_response(),
        Err(detail) => problem(StatusCode::UNPROCESSABLE_ENTITY, &detail),
    }
}

async fn read(State(users): State<Users>, Path(id): Path<String>) -> Response {
    match users.get(&id) {
        Some(user) => {
            tracing::info!(user_id = %id, "user looked up");
            Json(user).into_response()
        }
        None => problem(StatusCode::NOT_FOUND, &format!("no user {id}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_validates_and_get_finds() {
        let users = Users::default();
        let ada = users
            .create(NewUser {
                name: " Ada ".into(),
                email: "ada@example.com".into(),
            })
            .unwrap();
        assert!(ada.id.starts_with("usr_"));
        assert_eq!(ada.name, "Ada");
        assert_eq!(users.get(&ada.id), Some(ada));
        assert!(users.get("usr_nope").is_none());
        let bad = users.create(NewUser {
            name: "Bob".into(),
            email: "nope".into(),
        });
        assert!(bad.is_err());
    }
}
