from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from annotate import views as annotate_views

urlpatterns = [
    path("", annotate_views.home, name="home"),
    path("label/<slug:slug>/", annotate_views.label, name="label"),
    path("media/samples/<int:sample_id>", annotate_views.sample_media, name="sample-media"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/", include("annotate.api.urls")),
    path("api/", include("rewards.api.urls")),
]
